"""Print the pip requirements of an image, from pyproject.toml (the one place they are kept).

`python deploy/docker/requirements.py frontend`: the dependencies without torch (the frontend role never
imports it), plus the s3 extra. `backend`: the dependencies plus the s3 extra (torch comes with the image).
pyproject has no torch-free extra (torch is a main dependency), so the frontend image installs the
project with `pip install --no-deps .` and this list.
"""
import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
role = sys.argv[1] if len(sys.argv) > 1 else "frontend"
reqs = project["dependencies"] + project["optional-dependencies"]["s3"]
if role == "frontend":
    reqs = [r for r in reqs if re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() != "torch"]
print("\n".join(reqs))
