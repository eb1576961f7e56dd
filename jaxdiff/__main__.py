"""``python -m jaxdiff train|sample|evaluate [options]``: the same programs as ``jaxdiff-train`` etc."""
import sys

PROGRAMS = ("train", "sample", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in PROGRAMS:
        print(f"usage: python -m jaxdiff {{{','.join(PROGRAMS)}}} [options] (--help after the program name)",
              file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(f"jaxdiff.cli.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
