"""Config files for the experiment runners."""
