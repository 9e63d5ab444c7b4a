"""The ground floor: errors, the in-memory model, recorded edits, inputs, selection, safe YAML, calibration data.

Nothing here imports from the other growcli packages."""
