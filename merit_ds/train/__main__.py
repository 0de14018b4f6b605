from .loop import exit_process, main

exit_process(main())  # see exit_process: no interpreter teardown after a finished run
