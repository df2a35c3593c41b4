"""python -m vl_masking.figures: the figures command."""

from .command import command

command()
