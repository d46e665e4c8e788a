"""``python -m pmaccel`` (also ``accelerate launch -m pmaccel``)."""

from pmaccel.cli import command

if __name__ == "__main__":
    command()
