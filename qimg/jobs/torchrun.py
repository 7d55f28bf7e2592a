"""A sharded run under torchrun: torchrun stops every rank as soon as one exits non-zero, so a shard that
ended with a bad file (exit 1, its other files done) would cut the other shards short. Each rank counts
itself finished in the key-value store torchrun's agent hosts (TORCHELASTIC_USE_AGENT_STORE, its default;
no process group), and one that failed waits until every rank has before it exits. A rank that dies outright
is torchrun's to handle: it stops them all, and a re-run with --skip-existing resumes."""

import os
import signal
import time
from typing import Mapping

POLL_SECONDS = 2.0


def finish(code: int, signals, env: Mapping[str, str] = os.environ) -> None:
    """Count this rank finished; with `code` non-zero wait for the others. `signals`: the stopping signals
    this process takes; while waiting, each ends it at once with `code` (the run has said all it had to)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not env.get("MASTER_ADDR") or not env.get("WORLD_SIZE"):
        return  # not torchrun, or a store that only a process group's rank 0 would host
    try:
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=60))
        key = f"qimg/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/finished"
        finished = store.add(key, 1)
        if code == 0:
            return
        for signum in signals:
            signal.signal(signum, lambda *_: os._exit(code))
        while finished < int(env["WORLD_SIZE"]):
            time.sleep(POLL_SECONDS)
            finished = store.add(key, 0)
    except (ImportError, RuntimeError, ValueError, KeyError, OSError):
        return  # no store to reach: exit now, as torchrun expects of a plain program
