"""The safety filter's cost (jobs/safety.py): the image check against a built-in render on the CPU, and the prompt
check (word list and prompt classifier: no model load).

    PYTHONPATH=. python benchmarks/safety.py [--size 128] [--steps 24] [--reps 5] [--threads 1] [--terms 5000]

The image check runs once per output (and per preview written): its cost is the default classifier (open_nsfw on
onnxruntime, `pip install 'qimg[safety]'`) scoring the decoded image, against the render that made it (the
built-in model, one sampling run and the VAE decode; runs interleaved, medians). Loading the classifier is paid
once per process (the worker keeps it). The prompt check is a word list of --terms terms read, folded and
compiled, then matched against a prompt.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import machine, timed

from qimg.engine.engine import Engine
from qimg.engine.request import Sampling
from qimg.jobs import safety
from qimg.jobs.spec import Safety

PROMPT = "a red circle above a blue square, 一个红色的圆在蓝色方块的上面"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--terms", type=int, default=5000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    from qimg.weights.folders import builtin_model

    engine = Engine(builtin_model(), "cpu", "float32")
    spec = Safety("image")
    started = time.perf_counter()
    safety.prepare(spec)  # the classifier loaded: once per process
    load = time.perf_counter() - started
    sampling = Sampling(PROMPT, " ", args.steps, 4.0, 7)
    image = engine.generate(sampling, args.size, args.size).image
    t = timed({"render": lambda: engine.generate(sampling, args.size, args.size),
               "check": lambda: safety.image_hit(spec, image)}, args.reps)
    print(f"image check: {args.size}x{args.size}, {args.steps} steps: render {t['render']:.3f} s, check "
          f"{t['check'] * 1000:.1f} ms = {t['check'] / t['render'] * 100:.1f}% of the render; classifier load "
          f"{load:.2f} s once per process (onnxruntime {__import__('onnxruntime').__version__})")

    words = Path(tempfile.mkdtemp()) / "words.txt"
    words.write_text("# a list of made-up terms\n" + "".join(f"term{i} phrase {i}\n" for i in range(args.terms))
                     + "禁止词\n")
    spec = Safety("prompt", (words,), prompt_classifier=f"{Path(__file__).parent.parent}/tests/safety_stubs.py:"
                                                         "flag_token")
    started = time.perf_counter()
    safety.prepare(spec)
    read = time.perf_counter() - started
    n = 200
    started = time.perf_counter()
    for _ in range(n):
        safety.check_prompt(spec, PROMPT, "--prompt")
    check = (time.perf_counter() - started) / n
    print(f"prompt check: a list of {args.terms + 1} terms read and compiled in {read * 1000:.0f} ms (again only "
          f"when the file changes); one prompt checked in {check * 1e6:.0f} us; no model loaded")


if __name__ == "__main__":
    main()
