"""The `stackd` command line: a thin face over the library. Only this layer prints and exits."""
