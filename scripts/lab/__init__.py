"""Tools for the Gradio lab (python -m scripts.lab.<name>)."""
