from amigafuse.cli import main

raise SystemExit(main())
