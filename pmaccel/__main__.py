"""``python -m pmaccel`` (also ``accelerate launch -m pmaccel``)."""

from pmaccel.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
