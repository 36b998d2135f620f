"""The few-row product alone, streaming a whole model's weights: where a wide pass's cost comes from.

A decoding pass multiplies 1-8 rows by every weight of the model.  This times the few-row
kernel over all of a model's Linear weights in turn (so the weights stream from memory, as in
a pass), for n = 1..8 rows, interleaved, and prints t(n)/t(1) next to what the multiply-adds
alone would take (the same product timed on a weight that stays in L2, scaled to the model):
when a one-token pass is bound by the weight stream, a pass of n rows could cost t(1) if its
multiply-adds overlapped the stream; the gap between t(n) and t(1) is the part that does not.

With ``--packed`` it times the same products reading the weights packed
(``mtp_torch.decoding.packing``; the default's weights are a Q4_1/Q8_0 GGUF file's codes) and
checks that they give the float32 products' bits.

Run:  python examples/product_stream.py                      # model-shaped random weights, quick
      python examples/product_stream.py --model default      # the embedded default's weights
      python examples/product_stream.py --model default --packed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtp_torch.decoding.native import cpu_isa, cpu_model, load_native
from mtp_torch.decoding.packing import pack_weight

ROWS = (1, 2, 3, 4, 5, 6, 7, 8)


def q4_1_codes(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Random float32 weights that are Q4_1 codes (d * q + m per 32 values), as a GGUF file's."""
    blocks = shape[0] * shape[1] // 32
    d = (torch.rand(blocks, 1, generator=generator) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(blocks, 1, generator=generator) * 0.05).half().float()
    q = torch.randint(0, 16, (blocks, 32), generator=generator).float()
    q[:, 0], q[:, 1] = 0, 15  # a quantizer maps a block's min and max to 0 and 15
    return (d * q + m).reshape(shape)


def model_weights(name: str | None) -> list[torch.Tensor]:
    if name is None:  # a 12-layer model of the default's widths: ~200 MB, enough to stream
        generator = torch.Generator().manual_seed(0)
        shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 12
        return [q4_1_codes(shape, generator) for shape in shapes]
    from mtp_torch import MTPModel

    model = MTPModel.from_pretrained(name).model
    return [
        module.weight.detach().contiguous()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model name or directory")
    parser.add_argument("--packed", action="store_true", help="also read the weights packed")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = load_native()
    if native is None:
        raise SystemExit("the compiled kernel is unavailable on this machine")
    weights = model_weights(args.model)
    packed = [pack_weight(w) for w in weights] if args.packed else []
    if args.packed and any(p is None for p in packed):
        raise SystemExit("--packed: some weight is not a Q4_1/Q8_0 code")
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"CPU: {cpu_model()} ({' '.join(cpu_isa())}); {len(weights)} weights, "
          f"{megabytes:.0f} MB float32" + (f", {sum(p.nbytes for p in packed) / 1e6:.0f} MB packed" if packed else ""))  # fmt: skip
    inputs = {(n, w.shape[1]): torch.randn(n, w.shape[1]) for n in ROWS for w in weights}
    kinds = ["float32"] + (["packed"] if packed else [])
    same = True

    def product(kind: str, index: int, n: int) -> torch.Tensor:
        weight = weights[index]
        x = inputs[(n, weight.shape[1])]
        if kind == "float32":
            return native.skinny_linear(x, weight)
        return native.packed_linear(x, weight, packed[index].q, packed[index].scales)

    if packed:
        for n in ROWS:
            for index in range(0, len(weights), max(1, len(weights) // 8)):
                same = same and torch.equal(product("packed", index, n), product("float32", index, n))
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in kinds for n in ROWS}
    for _ in range(args.repeats + 1):  # one untimed warm-up round
        for n in ROWS:
            for kind in kinds:
                start = time.perf_counter()
                for index in range(len(weights)):
                    product(kind, index, n)
                times[(kind, n)].append(time.perf_counter() - start)
    # The multiply-adds alone: the same product on a weight that stays in L2, per weight value.
    cached = weights[0][:384].contiguous()
    compute: dict[int, float] = {}
    for n in ROWS:
        x = torch.randn(n, cached.shape[1])
        for _ in range(20):
            native.skinny_linear(x, cached)
        start = time.perf_counter()
        for _ in range(400):
            native.skinny_linear(x, cached)
        per_value = (time.perf_counter() - start) / 400 / cached.numel()
        compute[n] = per_value * sum(w.numel() for w in weights)
    for kind in kinds:
        one = statistics.median(times[(kind, 1)][1:])
        print(f"{kind}: t(1) {one * 1e3:.2f} ms ({megabytes / one / 1e3 if kind == 'float32' else sum(p.nbytes for p in packed) / one / 1e9:.1f} GB/s)")  # fmt: skip
        print("| n | t(n) / t(1) | float32 multiply-adds alone, in L2 / t(1) |\n|---|---|---|")
        for n in ROWS:
            ratio = statistics.median(times[(kind, n)][1:]) / one
            print(f"| {n} | {ratio:.2f} | {compute[n] / one:.2f} |")
    if packed:
        print(f"packed products equal the float32 ones bit for bit: {same}")
    print("products timed: True")


if __name__ == "__main__":
    main()
