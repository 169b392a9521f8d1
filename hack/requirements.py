"""Print the dependencies of pyproject.toml, with those of the extras named as arguments.

The Dockerfile installs them in a layer of their own, before the source is copied, so a source
change reuses the dependency layers.
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2:]:
    deps += project["optional-dependencies"][extra]
print("\n".join(deps))
