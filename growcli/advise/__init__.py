"""Where to grow: scores from calibration data (GradMax, Firefly, NeST)."""
