"""videovae subpackage."""
