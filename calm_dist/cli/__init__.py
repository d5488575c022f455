"""Console scripts that sit above the layers they drive: argument parsing and reporting only."""
