"""Reading a traced model: coupled channels, the residual stream, attention sites, residual writers.

Analyses decide what may grow and how; they change nothing."""
