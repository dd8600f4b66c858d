"""The templates and scripts that ship inside the backchat package (see backchat/resources.py)."""
