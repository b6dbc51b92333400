"""The `brickyard` command line: thin commands over the Remote/Local clients (`registry.client`)."""
