"""A warm background worker: `qimg` commands from a shell loop run in one process that keeps the model
loaded. client.py (light: no torch, numpy, PIL or typer) submits a job, which is its argv with its standard
streams' file descriptors; server.py (standard library only; clients.py its side of each client) queues the
jobs and hands them one at a time to its job process, runner.py, which re-runs the command line on them
(qimg.cli.app.run, through qimg.cli.in_worker, which keeps the engine between jobs), so no job classes cross
the socket; protocol.py frames the messages and says their shapes; paths.py finds and checks the per-user
socket folder and opens the worker's own files."""
