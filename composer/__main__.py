"""``python -m composer``: the local composer CLI."""

from composer.cli import app

if __name__ == "__main__":
    app(prog_name="composer")
