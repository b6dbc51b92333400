"""Compositions from request to built files: recipes, the build workers, few-shot weight fitting,
the quality check of bricks, and instruction scores turned into merge weights."""
