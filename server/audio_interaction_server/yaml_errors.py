"""A YAML error in one line, for the configuration file and a checkpoint's model_config.yaml alike.

PyYAML's own text spans several lines and names the text "<unicode string>" rather than the file. Imports nothing
of the package.
"""

from __future__ import annotations

import yaml


def where(error: yaml.YAMLError) -> str:
    """`` (line L, column C): what`` of a YAML error, on one line (``: <error>`` where it has no position)."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f": {error}"
    mark = error.problem_mark
    return f" (line {mark.line + 1}, column {mark.column + 1}): {error.problem or error.context}"
