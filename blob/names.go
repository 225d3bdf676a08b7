package blob

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
)

// ErrInvalidName: storage refused a container or blob name.
var ErrInvalidName = errors.New("invalid name")

// describeInvalidName explains the 400 storage answers to a name it does not
// accept: OutOfRangeInput (Azure, for container names of the wrong length or
// characters) or InvalidResourceName (Azure and Azurite). Users meet it when
// they first create a container, as "400 OutOfRangeInput", which names
// neither the container nor the rule. Nil when re is another error.
func describeInvalidName(re *azcore.ResponseError, l location, op string) error {
	code := bloberror.Code(re.ErrorCode)
	if re.StatusCode != http.StatusBadRequest || code != bloberror.OutOfRangeInput && code != bloberror.InvalidResourceName {
		return nil
	}
	return fmt.Errorf("%s %s: %w: storage refused the container name %q (%s): a container name is 3 to 63 "+
		"lowercase letters, digits and hyphens, starting with a letter or digit, without two hyphens in a row; "+
		"a blob name is 1 to 1024 characters", op, l.redacted(), ErrInvalidName, l.container, code)
}
