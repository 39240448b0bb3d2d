from verify.harness import main

raise SystemExit(main())
