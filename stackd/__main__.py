"""`python -m stackd`: the same as the `stackd` command."""

from stackd.cli.main import main

raise SystemExit(main())
