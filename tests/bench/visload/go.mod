module cqrs/tests/bench/visload

go 1.22
