"""Result objects the node emits: one module or subpackage per IOD, plus the conformance gate."""
