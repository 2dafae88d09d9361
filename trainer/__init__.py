"""cad-train: build, evaluate and export the node's model bundles."""
