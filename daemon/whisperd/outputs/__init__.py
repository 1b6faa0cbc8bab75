"""Text, subtitle and JSON writers, all fed from one Transcript."""

from whisperd.outputs.writers import FORMATS, output_paths, render, write_outputs

__all__ = ["FORMATS", "output_paths", "render", "write_outputs"]
