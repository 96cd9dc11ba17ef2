"""Glue to the libraries tuneforge builds on (bitsandbytes), kept out of the kernels and models."""
