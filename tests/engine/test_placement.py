"""The layer split's plan (engine/placement.py), pure: contiguous block ranges sized by free memory or given by
--split, the text encoder and VAE placed, and the splits that cannot work refused with one line."""

import itertools
import random
import runpy
from pathlib import Path

import pytest

from qimg.engine.placement import Needs, balanced_ranges, by_block, given_ranges, plan, weights_of
from qimg.errors import UsageError

GB = 2**30


def worst(sizes, shares, ranges, first=0):
    return max((sum(sizes[a:b]) + (first if i == 0 else 0)) / s for i, ((a, b), s) in enumerate(zip(ranges, shares)))


def test_equal_devices_take_equal_halves_and_unequal_ones_shares_by_memory():
    assert balanced_ranges([1] * 60, [1, 1]) == [(0, 30), (30, 60)]
    assert balanced_ranges([1] * 60, [24, 48]) == [(0, 20), (20, 60)]
    assert balanced_ranges([1] * 60, [1, 1, 1, 1]) == [(0, 15), (15, 30), (30, 45), (45, 60)]
    # the layers around the blocks weigh on the first device: it takes fewer blocks
    assert balanced_ranges([10] * 6, [1, 1], first=20) == [(0, 2), (2, 6)]


def test_the_ranges_are_the_best_contiguous_split():
    rng = random.Random(0)
    for _ in range(40):
        n, d = rng.randint(2, 8), rng.randint(1, 4)
        if d > n:
            continue
        sizes = [rng.randint(1, 9) for _ in range(n)]
        shares = [rng.uniform(0.5, 3) for _ in range(d)]
        first = rng.randint(0, 5)
        ranges = balanced_ranges(sizes, shares, first)
        assert [a for a, _ in ranges][0] == 0 and ranges[-1][1] == n
        assert all(b > a for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(d - 1))
        best = min(worst(sizes, shares, list(zip((0, *cuts), (*cuts, n))), first)
                   for cuts in itertools.combinations(range(1, n), d - 1))
        assert worst(sizes, shares, ranges, first) == pytest.approx(best)


def test_split_counts_become_ranges():
    assert given_ranges((32, 28), 60, 2) == [(0, 32), (32, 60)]
    assert given_ranges((1, 1, 2), 4, 3) == [(0, 1), (1, 2), (2, 4)]


@pytest.mark.parametrize("split, fragment", [((30, 20), "adds up to 50, and the model has 60"),
                                             ((60,), "gives 1 block counts for 2 --devices"),
                                             ((60, 0), "at least one block")])
def test_split_counts_that_do_not_fit_the_model_are_refused(split, fragment):
    with pytest.raises(UsageError, match=fragment):
        given_ranges(split, 60, 2)


def test_each_device_holds_its_blocks_and_the_first_the_layers_around_them():
    assert weights_of([1, 2, 3, 4], 10, [(0, 1), (1, 4)]) == (11, 9)
    assert weights_of([5, 5, 5], 2, [(0, 3)]) == (17,)
    placed = plan(["a", "b"], Needs([1, 2, 3, 4], 10, 0, 0, 0), {"a": None, "b": None}, (1, 3))
    assert placed.weights == (11, 9)


def needs(blocks=60, block=GB // 3, text=14 * GB, working=GB):
    return Needs([block] * blocks, GB // 10, text, GB // 4, working)


def test_two_24gb_cards_hold_the_bf16_blocks_and_the_text_encoder_encodes_first():
    p = plan(["cuda:0", "cuda:1"], needs(), {"cuda:0": 23 * GB, "cuda:1": 23 * GB})
    assert p.ranges == ((0, 30), (30, 60)) and p.weights[0] == 30 * (GB // 3) + GB // 10
    assert p.text_released and p.text == "cuda:0" and p.vae == "cuda:1"
    assert "encodes first" in p.lines()[-1] and p.lines()[0].startswith("cuda:0: blocks 0-29 (30), 10.1 GB")
    assert p.as_dict()["devices"][1] == {"device": "cuda:1", "blocks": [30, 60], "weight_bytes": 30 * (GB // 3),
                                         "free_bytes": 23 * GB}


def test_a_text_encoder_that_fits_beside_the_blocks_stays_loaded_where_most_is_left():
    p = plan(["cuda:0", "cuda:1"], needs(), {"cuda:0": 40 * GB, "cuda:1": 80 * GB})
    assert p.ranges[1][1] - p.ranges[1][0] > 30  # the larger card takes more blocks
    assert not p.text_released and p.text == "cuda:1"


def test_a_device_named_twice_shares_its_memory_and_split_gives_the_counts():
    p = plan(["cpu", "cpu"], needs(blocks=2), {"cpu": 20 * GB})
    assert p.ranges == ((0, 1), (1, 2)) and p.text == p.vae == "cpu" and not p.text_released
    assert plan(["cpu", "cpu"], needs(blocks=4), {"cpu": 16 * GB}, split=(3, 1)).ranges == ((0, 3), (3, 4))


def test_unknown_free_memory_splits_evenly_without_checks():
    p = plan(["mps", "cpu"], needs(blocks=4), {"mps": None, "cpu": None})
    assert p.ranges == ((0, 2), (2, 4)) and not p.text_released and p.free == (None, None)
    assert "free" not in p.lines()[0]


def test_a_split_that_does_not_fit_names_the_device():
    with pytest.raises(UsageError, match=r"cuda:1 would hold 13.3 GB .* has 11.0 GB free.*more blocks"):
        plan(["cuda:0", "cuda:1"], needs(), {"cuda:0": 23 * GB, "cuda:1": 12 * GB}, split=(20, 40))
    with pytest.raises(UsageError, match="use more devices, --quantize fp8"):
        plan(["cuda:0", "cuda:1"], needs(), {"cuda:0": 8 * GB, "cuda:1": 8 * GB})
    with pytest.raises(UsageError, match="3 devices for 2 transformer blocks"):
        plan(["cpu", "cpu", "cpu"], needs(blocks=2), {"cpu": 16 * GB})


def test_by_block_groups_the_weights():
    sizes = {"img_in.weight": 5, "transformer_blocks.0.a": 1, "transformer_blocks.1.a": 2,
             "transformer_blocks.0.b": 3, "proj_out.bias": 1, "transformer_blocks.10.a": 7}
    sizes |= {f"transformer_blocks.{i}.a": 1 for i in range(2, 10)}
    blocks, rest = by_block(sizes)
    assert blocks[:2] == [4, 2] and blocks[10] == 7 and len(blocks) == 11 and rest == 6


@pytest.mark.slow
def test_the_memory_table_in_the_docs_is_what_the_script_prints(capsys):
    root = Path(__file__).resolve().parents[2]
    runpy.run_path(str(root / "scripts" / "split_memory.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert "| bf16 | 2 | 30,30 | 19.1 |" in printed
    assert printed in (root / "docs" / "parallel.md").read_text(), "run python scripts/split_memory.py"
