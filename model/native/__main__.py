"""`python -m model.native`: build (or find) the native CPU decode step."""

from . import main

raise SystemExit(main())
