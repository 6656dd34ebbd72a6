"""Modeling code shipped inside every output folder: it imports only torch, transformers and fla."""
