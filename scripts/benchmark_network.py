"""Parameters and FLOPs per 256² tile of every registry encoder with the shared decoder (default widths and
the demo's light widths), counted with torch.utils.flop_counter on the meta device (no weights needed)."""

import argparse
from datetime import date

from cellgap.cli import DEMO_DECODER
from cellgap.encoders import ENCODERS
from cellgap.network import COST_TILE, network_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=5, help="cell classes C (PanNuke: 5)")
    args = parser.parse_args()
    print(f"# {date.today()}; per {COST_TILE}² tile, C = {args.classes}, forward pass, "
          "multiply-add = 2 FLOPs")
    print("| encoder | encoder params (M) | encoder GFLOPs | decoder params (M), default | decoder GFLOPs, default "
          "| decoder params (M), demo | decoder GFLOPs, demo |")
    print("|---|---|---|---|---|---|---|")
    for key in ENCODERS:
        full = network_cost(key, args.classes)
        demo = network_cost(key, args.classes, decoder={k: v for k, v in DEMO_DECODER.items() if k != "channels_last"})
        print(f"| {key} | {full['encoder_params'] / 1e6:.1f} | {full['encoder_gflops']:.1f} | "
              f"{full['decoder_params'] / 1e6:.2f} | {full['gflops'] - full['encoder_gflops']:.1f} | "
              f"{demo['decoder_params'] / 1e6:.2f} | {demo['gflops'] - demo['encoder_gflops']:.2f} |")


if __name__ == "__main__":
    main()
