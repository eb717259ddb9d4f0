"""Write bundles/cisca_<encoder>/ for every encoder of the registry (or the ones named)."""

import argparse
from pathlib import Path

from cellgap.bundle import all_bundle_keys, write_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("encoders", nargs="*", help="registry keys (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bundles"), help="bundles folder")
    args = parser.parse_args()
    for key in args.encoders or all_bundle_keys():
        print(write_bundle(key, args.out))


if __name__ == "__main__":
    main()
