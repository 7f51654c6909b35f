"""Control service of an isolated lung perfusion (ILuP) cart."""

__version__ = "0.1.0"
