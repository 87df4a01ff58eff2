"""Datasets: built-in synthetic benchmark, image folders, and the input pipeline."""
