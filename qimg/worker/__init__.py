"""A warm background worker: `qimg` commands from a shell loop run in one process that keeps the model
loaded. client.py (light: no torch, numpy, PIL or typer) submits a job; server.py runs jobs one at a time;
paths.py finds and checks the per-user socket folder; warm.py keeps the last engine."""
