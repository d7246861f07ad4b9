from lardo_ray.cli import main

raise SystemExit(main())
