"""Config presets (*.yaml), shipped as package data: ``--config NAME`` finds them by name."""
