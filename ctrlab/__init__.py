"""ctrlab: click-through-rate prediction with automated feature-interaction search."""

__version__ = "0.1.0"
