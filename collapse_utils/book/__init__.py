"""Book: figures, what each page shows, the widget explorer and the papermill runner."""

import sys

# Every page imports myst_nb's glue, which imports nbformat, then jsonschema; jsonschema imports
# rfc3987_syntax where it is installed (JupyterLab's dependencies bring it) and that compiles 38
# grammars on import: 2.8 s of every page's kernel, a tenth of the smoke book. Pages validate no
# IRIs, so it stays out (None in sys.modules makes its import an ImportError, which jsonschema
# takes as "not installed"). A process that imported it already keeps it.
sys.modules.setdefault("rfc3987_syntax", None)
