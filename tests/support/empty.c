/* no code: holds the embedded migrations for the tests */
