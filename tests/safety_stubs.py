"""Stub classifiers for the safety filter's tests (jobs/safety.py), named to it as `safety_stubs:NAME`: they flag
by plain properties of synthetic inputs (everything, bright pixels, a test token), so no test needs unsafe
material. `calls` records every image scored; `flag_from` makes `flag_later` flag from that call on."""

import numpy as np

TOKEN = "UNSAFE_TEST_TOKEN"
calls: list = []
flag_from = 1


def flag_all(image) -> float:
    calls.append(np.asarray(image))
    return 1.0


def flag_none(image) -> float:
    calls.append(np.asarray(image))
    return 0.0


def flag_bright(image) -> float:
    """1 for an image whose mean is over 200 (a white picture), 0 otherwise."""
    calls.append(np.asarray(image))
    return float(np.asarray(image).mean() > 200)


def half(image) -> float:
    return 0.5


def flag_later(image) -> float:
    """0 for the first `flag_from - 1` images scored, 1 after."""
    calls.append(np.asarray(image))
    return float(len(calls) >= flag_from)


def flag_token(text: str) -> float:
    return 1.0 if TOKEN in text else 0.0


def out_of_range(value) -> float:
    return 2.0
