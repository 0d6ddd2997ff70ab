"""TorchServe handler package. Inside a .mar the files are imported flat instead."""
