from ares.roles.cli import main

raise SystemExit(main())
