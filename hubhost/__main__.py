from hubhost.cli.main import main

raise SystemExit(main())
