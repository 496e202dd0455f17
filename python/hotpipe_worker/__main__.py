import sys

from hotpipe_worker import main

sys.exit(main())
