import sys

from harbord.daemon import main

sys.exit(main())
