"""Where each part of the model runs under --devices: the layer split's plan, as pure functions.

The transformer's blocks are cut into contiguous ranges, one per named device, in the order named: by
--split (the counts given), or sized by memory so that every device fills the same fraction of what it has
free (the largest such fraction as small as the block sizes allow). The small layers around the blocks
(input projections, the timestep embedding, the output layers) stay on the first device. The VAE goes where
the most memory is left; the text encoder too when it fits beside the blocks there, else it runs first on the
device with the most free memory and is released before the transformer loads ("encoded first"). A device
named twice shares its free memory between its names. Nothing here touches a device: the budgets come in.
"""

from dataclasses import dataclass

from qimg.errors import UsageError

GB = 2**30


def size(n: int) -> str:
    return f"{n / GB:,.1f} GB" if n >= GB // 10 else f"{n / 2**20:,.1f} MB"


@dataclass(frozen=True)
class Placement:
    """A layer split: per named device its blocks [start, stop) and the bytes of transformer weights it holds
    (the first one's include the layers around the blocks), the free memory it was sized against (None: not
    known), where the text encoder and the VAE run, and whether the text encoder is released after encoding."""

    devices: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    weights: tuple[int, ...]
    free: tuple[int | None, ...]
    text: str
    text_released: bool
    vae: str

    def lines(self) -> list[str]:
        """The plan as the user reads it, one line per device, then the text encoder's and the VAE's places."""
        out = []
        for device, (start, stop), n, free in zip(self.devices, self.ranges, self.weights, self.free):
            room = f" ({size(free)} free)" if free is not None else ""
            out.append(f"{device}: blocks {start}-{stop - 1} ({stop - start}), {size(n)} of weights{room}")
        when = "encodes first, then is released" if self.text_released else "stays loaded"
        out.append(f"text encoder: {self.text} ({when}); VAE: {self.vae}")
        return out

    def as_dict(self) -> dict:
        """For --json."""
        return {"devices": [{"device": d, "blocks": [a, b], "weight_bytes": n, "free_bytes": f}
                            for d, (a, b), n, f in zip(self.devices, self.ranges, self.weights, self.free)],
                "text_encoder": {"device": self.text, "released": self.text_released}, "vae": self.vae}


def given_ranges(split: tuple[int, ...], blocks: int, devices: int) -> list[tuple[int, int]]:
    """--split's counts as ranges; a UsageError when they do not match the devices or the model's blocks."""
    if len(split) != devices:
        raise UsageError(f"--split gives {len(split)} block counts for {devices} --devices; give one per device")
    if any(n < 1 for n in split):
        raise UsageError(f"--split {','.join(map(str, split))}: every device takes at least one block")
    if sum(split) != blocks:
        raise UsageError(f"--split {','.join(map(str, split))} adds up to {sum(split)}, and the model has {blocks} "
                         f"transformer blocks; give counts that add up to {blocks}")
    stops = [sum(split[:i + 1]) for i in range(devices)]
    return list(zip([0, *stops[:-1]], stops))


def balanced_ranges(sizes: list[int], shares: list[float], first: int = 0) -> list[tuple[int, int]]:
    """Contiguous ranges of blocks (bytes `sizes`), one per device in order, at least one block each, making the
    largest load / share as small as it can be (exact, by dynamic programming over the cut points). shares:
    what each device can hold (bytes, or any positive weights); first: bytes the first device holds besides."""
    n, d = len(sizes), len(shares)
    if d > n:
        raise UsageError(f"{d} devices for {n} transformer blocks: name at most {n}")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)

    def cost(k: int, a: int, b: int) -> float:  # device k holding blocks [a, b)
        return (prefix[b] - prefix[a] + (first if k == 0 else 0)) / shares[k]

    # best[k][b]: the least worst ratio putting blocks [0, b) on devices 0..k; cut[k][b]: where device k starts
    best = [[cost(0, 0, b) if b >= 1 else float("inf") for b in range(n + 1)]]
    cut = [[0] * (n + 1)]
    for k in range(1, d):
        row, cuts = [float("inf")] * (n + 1), [0] * (n + 1)
        for b in range(k + 1, n + 1):
            for a in range(k, b):
                value = max(best[k - 1][a], cost(k, a, b))
                if value < row[b]:
                    row[b], cuts[b] = value, a
        best.append(row)
        cut.append(cuts)
    ranges, b = [], n
    for k in range(d - 1, -1, -1):
        a = cut[k][b]
        ranges.append((a, b))
        b = a
    return ranges[::-1]


@dataclass(frozen=True)
class Needs:
    """What the model needs, in bytes: each block's weights, the layers around them, the text encoder, the VAE,
    and the working memory (activations) each device keeps free besides."""

    blocks: list[int]
    rest: int
    text: int
    vae: int
    working: int


def plan(devices: list[str], needs: Needs, free: dict[str, int | None], split: tuple[int, ...] = ()) -> Placement:
    """The placement of `needs` on `devices` (names, in order; a name may repeat), given each distinct device's
    free bytes (None: unknown, then the blocks are shared out evenly and nothing is checked). A split that
    cannot fit is a UsageError naming the device and what to do."""
    count = {name: devices.count(name) for name in devices}
    known = all(free[name] is not None for name in count)
    # what one name of a device may hold for blocks: its free memory less the working memory, shared by its names
    room = {name: max(free[name] - needs.working, 0) if known else None for name in count}
    shares = [room[name] / count[name] if known else 1.0 for name in devices]
    if split:
        ranges = given_ranges(split, len(needs.blocks), len(devices))
    else:
        ranges = balanced_ranges(needs.blocks, [max(s, 1.0) for s in shares], needs.rest)
    weights = weights_of(needs.blocks, needs.rest, ranges)
    held = {name: sum(w for d, w in zip(devices, weights) if d == name) for name in count}
    if known:
        for name in count:
            if held[name] > room[name]:
                fix = "give the devices with more free memory more blocks" if split else \
                    "use more devices, --quantize fp8 or a quantized --transformer file"
                raise UsageError(f"--devices: {name} would hold {size(held[name])} of transformer weights and "
                                 f"has {size(room[name])} free besides the working memory; {fix}")
    left = {name: (room[name] - held[name]) if known else 0 for name in count}
    vae = max(count, key=lambda name: left[name])  # the first of the roomiest on a tie (dicts keep order)
    left[vae] -= needs.vae
    text = max(count, key=lambda name: left[name])
    released = known and needs.text > left[text]
    if released:  # encoded before the transformer loads: then every device has all of its free memory
        text = max(count, key=lambda name: free[name])
    return Placement(tuple(devices), tuple(ranges), weights, tuple(free[name] for name in devices), text, released,
                     vae)


def weights_of(blocks: list[int], rest: int, ranges) -> tuple[int, ...]:
    """Bytes of transformer weights each device holds: its range's blocks, the first one the rest besides."""
    return tuple(sum(blocks[a:b]) + (rest if i == 0 else 0) for i, (a, b) in enumerate(ranges))


def by_block(sizes: dict[str, int]) -> tuple[list[int], int]:
    """Bytes per tensor name (weights/transformer.tensor_sizes) -> (bytes of each block in order, bytes of the
    rest)."""
    blocks: dict[int, int] = {}
    rest = 0
    for name, n in sizes.items():
        if name.startswith("transformer_blocks."):
            index = int(name.split(".")[1])
            blocks[index] = blocks.get(index, 0) + n
        else:
            rest += n
    return [blocks[i] for i in range(len(blocks))], rest


def module_bytes(module, itemsize: int) -> int:
    """Bytes of an nn.Module's parameters and buffers (built on the meta device: no memory) in a dtype of
    `itemsize` bytes."""
    return sum(t.numel() for t in (*module.parameters(), *module.buffers())) * itemsize
