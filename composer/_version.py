"""The composer's version, recorded in every composition's ``brickyard.json``."""

COMPOSER_VERSION = "0.1.0"
