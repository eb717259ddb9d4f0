"""Write a self-contained model-zoo archive of a bundle (the cellgap library vendored into its scripts/)."""

import argparse

from cellgap.bundle import export_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("encoder", help="registry key, e.g. uni")
    parser.add_argument("--out", default="dist", help="folder for <bundle>_v<version>.zip")
    parser.add_argument("--checkpoint", default=None, help="trained models/model.pt to include")
    args = parser.parse_args()
    print(export_bundle(args.encoder, args.out, args.checkpoint))


if __name__ == "__main__":
    main()
