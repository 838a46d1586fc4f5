"""matfusion: search hybrid composition + crystal-graph models for materials properties."""

__version__ = "0.1.0"
